import sys

from nvila_jax.cli import main

sys.exit(main())
