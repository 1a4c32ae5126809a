"""``python -m cdp_fast`` is ``cdp-fast`` (so ``torchrun ... -m cdp_fast COMMAND`` works)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
