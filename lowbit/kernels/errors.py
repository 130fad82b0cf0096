"""Errors of the kernel layer (a leaf package: it cannot use lowbit.errors, which sits above it)."""


class KernelConfigError(RuntimeError):
    """LOWBIT_ISA asks for an implementation this machine cannot run: an unknown name, an
    instruction set the CPU lacks, or a variant the install did not build."""
