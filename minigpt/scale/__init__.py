"""Scale: the counts carried to full size on real hardware.

scenario (TOML scenarios; the shipped ones are package data in scenarios/), work (a full-size
model's FLOPs and bytes), chips (rates and watts), training, serving, per_query (the throughput
form, boundaries, fleets and the break-even), communication, footprint (carbon, water), estimate
(`minigpt scale`: the whole estimate and its table), projection (a run beside GPT-3). Imports energy, hardware, counting and the base modules.
"""
