"""The engines every method runs on: the :class:`~.training.Trainer`, sliding-window inference that encodes each
window once (:mod:`.inference`), the 15-scenario evaluation with its results folders (:mod:`.evaluation`) and the
metrics (:mod:`.metrics`).
"""
