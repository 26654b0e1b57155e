"""Every setting is in README's settings table: a limit or a switch that users cannot find does not exist for them."""

from __future__ import annotations

import re
from pathlib import Path

from modalink.config import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def documented() -> set[str]:
    """Env names in the first column of README's tables. A row may shorten a family: ``MODALINK_IMAGE_ENCODER`` /
    ``_AUDIO_ENCODER`` (MODALINK_AUDIO_ENCODER) or ``MODALINK_FINETUNE_STEPS`` / ``_LR`` (MODALINK_FINETUNE_LR)."""
    names = set()
    for line in README.read_text().splitlines():
        if not line.startswith("| `MODALINK_"):
            continue
        first = line.split(" | ")[0]
        full = re.findall(r"`(MODALINK_\w+)`", first)
        names |= set(full)
        for suffix in re.findall(r"`(_\w+)`", first):
            names |= {"MODALINK" + suffix, full[0].split("_")[0] + "_" + full[0].split("_")[1] + suffix}
    return names


def test_every_setting_is_in_the_readme_table():
    missing = sorted({f"MODALINK_{name.upper()}" for name in Settings.model_fields} - documented())
    assert not missing, f"settings missing from README's table: {missing}"
