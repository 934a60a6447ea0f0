"""Horovod: a two-rank ``horovodrun --gloo`` job (``demo.run``)."""
