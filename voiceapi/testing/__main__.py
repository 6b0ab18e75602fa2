"""``python -m voiceapi.testing``: run the emulator in its own process (see ``_standalone``)."""

from ._standalone import main

raise SystemExit(main())
