"""``python -m mindyouzhi.train --config FILE`` — and the task script ``msrun`` launches
(``recipes/launch.sh``): absolute imports, so it also runs as a plain file path."""
from mindyouzhi.train.cli import main

if __name__ == "__main__":
    main()
