"""Engine replicas on Ray behind one OpenAI endpoint (`lowbit serve --replicas N`).

Layering: cluster sits above serve and engine (it reuses the serve layer's whole OpenAI app over a
facade that looks like one AsyncEngine); nothing below imports it, and only the modules that talk to
Ray import `ray`, so `router` (pure routing logic) and plain `lowbit serve` never need it.

- router.py    which replica takes a request: session, then prefix, then load (pure, no Ray)
- replica.py   the Ray actor that owns one AsyncEngine, and the delta wire format of its outputs
- replicas.py  the actor pool: start, health polling, restarts, scaling with drain
- engine.py    ClusterEngine: the AsyncEngine interface over the pool (what the serve app calls)
- ingress.py   the HTTP app: serve's app plus routing headers, per-replica metrics, /cluster routes
- launch.py    `lowbit serve --replicas/--ray-address`: start or join Ray, run the ingress
"""
