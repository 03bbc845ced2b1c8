"""Seeing inside a model: the cell-by-cell trace and worked examples."""
