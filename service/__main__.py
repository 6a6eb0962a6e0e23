"""``python -m service``: see :mod:`service.runtime.entry`. Imports only that (light) module."""

from service.runtime.entry import main

if __name__ == "__main__":
    main()
