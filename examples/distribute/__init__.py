"""tf.distribute: MirroredStrategy and a two-worker MWMS cluster (``demo.run``); ``train.py``
is the train script both run."""
