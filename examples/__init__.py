"""radam_dist's examples: what ``make demo`` runs (``python -m examples.demo``).

They live in the checkout, not in the wheel: run them from the checkout's root (``python -m
examples.demo``, ``python -m examples.ps.demo``), or a script by its path
(``python examples/distribute/train.py``). Each distributed part has ``run(out_dir)`` in
``examples/<part>/demo.py``: ``distribute`` (tf.distribute), ``horovod``, ``ps`` (the gRPC
parameter server). Install the library first (``make venv``, or ``pip install
'radam-dist[cpu,ps,demo]'``: matplotlib draws ``out/loss_curves.png``).
"""
