"""``python -m fmnist_crnn.tracking sync``: send what waits in this repository's journals."""

from fmnist_crnn.tracking.replay import main

main()
