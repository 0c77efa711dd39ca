"""Per-layer pattern plans for a device: cost models, layer sensitivities, and the budgeted choice.

``cost`` (the interface and the modelled GPU / N:M accelerator), ``profile`` (the measured CPU model),
``devices`` (device files), ``sensitivity`` (quality cost of each pattern per layer), ``solve``
(the exact multiple-choice knapsack) and ``planfile`` (plan.json).
"""
