"""From a finished run's results.json to the committed copy: the report, figures, README and notes blocks and
their prose, and ``python -m openclip_align.publishing`` that writes them (:mod:`.committed_copy`)."""
