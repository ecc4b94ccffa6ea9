"""Integrations with training frameworks that own the loop.

* :mod:`flightlog.integrations.lightning` -- ``FlightlogCallback`` for PyTorch Lightning.
* :mod:`flightlog.integrations.transformers` -- ``FlightlogCallback`` for Hugging Face ``Trainer``.

Nothing here imports a framework: each submodule imports its framework when it
is imported itself, so ``import flightlog`` stays light.
"""
