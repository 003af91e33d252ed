"""Trainer shim folder scanned by nnU-Net's external trainer lookup (``nnUNet_extTrainer``).

Installed as ``nnunet_samflare.nnunet_trainers``. It holds no classes of its own: see
``samflare_trainers.py``.
"""
