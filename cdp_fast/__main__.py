"""``python -m cdp_fast ...`` is ``cdp-fast ...``, so ``torchrun --nproc_per_node K -m cdp_fast
generate ...`` runs the command in K processes (see ``cdp_fast.generate``)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
