"""Neural-network building blocks shared by the methods (e.g. the mamba-ssm compatible :class:`~.mamba.Mamba`)."""
