"""Kernel providers, one module per backend, each registering its kernels with
:mod:`flashsparse.backends` when imported: :mod:`.triton`, :mod:`.cuda` (and any other compiled
backend), all compiled ones built by :mod:`.build`. Importing this package imports none of them."""
