"""End-to-end workflows built from the other layers: ``samflare demo`` and sharing a trained cascade.

This is the top library layer: it may use ``training``, ``inference`` and ``evaluation``; nothing below imports
it. The CLI modules only parse arguments and call in here.
"""
