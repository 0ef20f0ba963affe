"""Neural-network building blocks shared by the methods.

Mamba: the mamba-ssm compatible block is :class:`~.mamba.Mamba`; its selective scan (entry point, backend registry,
the ``reference`` / ``chunked`` scans and the ``mamba_ssm`` / ``triton`` adapters) lives in :mod:`.ops`, and the
Triton kernels in :mod:`.triton_scan`.
"""
