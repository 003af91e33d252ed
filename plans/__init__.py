"""JSON templates of the plug-in configurations (installed as ``nnunet_samflare.plans``)."""
