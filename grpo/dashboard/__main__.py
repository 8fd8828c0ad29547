import sys

from grpo.dashboard import main

sys.exit(main())
