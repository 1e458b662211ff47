"""Edits of one field of a nested dict (a dtk.json, a checkpoint's content), for tables of bad fields."""

from __future__ import annotations


def set_field(*keys_and_value):
    """`set_field("diffusion", "beta_end", 1.5)`: a function setting data["diffusion"]["beta_end"] = 1.5."""
    *keys, value = keys_and_value

    def change(data):
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value

    return change
