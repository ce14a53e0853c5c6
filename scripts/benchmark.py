"""Memory and speed benchmark (the same as `hf-lorafa bench`); see hf_lorafa/cli/bench.py for the protocol.

python scripts/benchmark.py --preset cpu --output benchmarks/cpu.json
"""

import sys

from hf_lorafa.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
