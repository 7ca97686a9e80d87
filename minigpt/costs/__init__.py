"""Costs: the closed-form cost model, reports of the meter's records, hardware profiles and energy.

This package reads records; it never imports the model (minigpt.nn).
"""
