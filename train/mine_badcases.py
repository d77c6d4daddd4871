"""Mine prompt-enricher badcases: the worst generations per category, for review before building DPO pairs.

    python train/mine_badcases.py scores.jsonl --top 10 --out badcases.md
    python train/mine_badcases.py scores.jsonl --format json --out badcases.json

Input and scoring are described in idglow_core/prompting/badcases.py (same as
``python -m idglow_core.prompting.badcases``).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from idglow_core.prompting.badcases import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
