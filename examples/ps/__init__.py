"""The gRPC parameter server: two shards, two Keras workers (``demo.run``, ``demo.py worker``)."""
