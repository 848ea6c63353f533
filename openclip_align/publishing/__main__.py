"""``python -m openclip_align.publishing``: make a finished run the committed copy (:mod:`.committed_copy`)."""
import sys

from .committed_copy import main

sys.exit(main())
