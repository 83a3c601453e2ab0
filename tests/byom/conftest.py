"""The user's code folder (this folder) on sys.path, as `teacher.code_dir` puts it in slimray's processes."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
