"""Command-line front ends: ``convmixer-train``, ``-evaluate``, ``-predict``, ``-export`` and ``-convert``.

Each module has ``main(argv=None)``, which parses its arguments before importing Keras, so ``--help`` and a bad
flag answer at once; :mod:`keras_convmixer.cli.common` holds what they share.
"""
