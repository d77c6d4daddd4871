"""``python -m idglow_core <command> ...``; see ``idglow_core.cli``."""
from .cli import main

raise SystemExit(main())
