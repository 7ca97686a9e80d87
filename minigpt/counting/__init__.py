"""Counting: what the model's work costs in FLOPs and bytes, measured and predicted.

meter (the counted primitives every product and elementwise pass goes through), closed_form (every
record the meter would write, predicted from shapes alone, kept independent of the meter so that
"counted = predicted" is a real test), scopes (the scope names the model enters and the closed
form predicts under), tables (grouped reports of records, costs.json/csv) and memory (what a run
needs in memory, from shapes). Imports only the base modules.
"""
