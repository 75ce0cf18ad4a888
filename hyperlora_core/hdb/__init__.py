"""HyperDreamBooth: a hypernetwork that predicts LiDB weights (``hyperlora_core.lidb``) from one face photo.

``config`` (the network's dataclass, the ``[hdb]`` section of a training config), ``encoder`` (the ViT face
encoder: open_clip's VisionTransformer, from CLIP ViT-L/14 weights or random), ``network`` (weight tokens refined
by a transformer decoder, linear heads to A_train / B_train) and ``checkpoint`` (one self-describing file).
Training lives in ``hyperlora_core.train`` (stage "hdb", and the ``lidb-preopt`` command).
"""
