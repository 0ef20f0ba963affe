"""Infrastructure with no knowledge of models: atomic files and case discovery (:mod:`.io`), weights-only
checkpoints (:mod:`.checkpoint`), devices and mixed precision (:mod:`.device`), one-line command-line failures
(:mod:`.cli`).
"""
