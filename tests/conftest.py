"""Every test runs offline and keeps SVD factors in a temporary cache, never the user's."""

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("SVDIFF_CACHE", tempfile.mkdtemp(prefix="svdiff-test-cache-"))
