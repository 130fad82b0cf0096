// The instruction-set variant this translation unit is compiled for.
//
// setup.py compiles every kernel source once per variant (AVX2+FMA+F16C, AVX-512), each with its own
// -m flags and -DLOWBIT_ISA=<variant>. Everything is declared inside namespace lowbit::LOWBIT_ISA, so
// the two builds of one source never share a symbol, and the torch dispatcher namespace is
// lowbit_<variant> (torch.ops.lowbit_avx2.rms_norm, torch.ops.lowbit_avx512.rms_norm).
#pragma once

#ifndef LOWBIT_ISA
#error "LOWBIT_ISA must name the instruction-set variant (setup.py passes -DLOWBIT_ISA=avx2 or avx512)"
#endif

#define LOWBIT_PASTE_(a, b) a##b
#define LOWBIT_PASTE(a, b) LOWBIT_PASTE_(a, b)
#define LOWBIT_STR_(a) #a
#define LOWBIT_STR(a) LOWBIT_STR_(a)

// torch dispatcher namespace of this variant, e.g. lowbit_avx2
#define LOWBIT_TORCH_NS LOWBIT_PASTE(lowbit_, LOWBIT_ISA)
