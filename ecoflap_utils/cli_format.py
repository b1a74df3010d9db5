"""The help formatter shared by the subcommands (``cli``, ``cli_evaluate``, ``cli_finetune``)."""
from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a flag's ``(default: X)`` unless its help already says it or there is none to show
    (``None``, ``False`` or suppressed)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)
