"""From raw BraTS folders to training batches: preprocessing (:mod:`.preprocessing`), the paper's splits
(:mod:`.splits`), datasets and samplers (:mod:`.dataset`), augmentation (:mod:`.transforms`) and synthetic cases
for tests and the demo (:mod:`.synthetic`).
"""
