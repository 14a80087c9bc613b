"""`python -m cllm`: the same program as the `cllm` command."""
from .cli import main

raise SystemExit(main())
