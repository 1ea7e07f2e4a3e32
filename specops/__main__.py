"""python -m specops {demo,bench,info} [...]"""
import sys

COMMANDS = ("demo", "bench", "info")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m specops {{{','.join(COMMANDS)}}} [options]   (-h after the command for its options)")
        return 2
    if argv[0] == "info":
        from ._build import show_build

        show_build()
        return 0
    if argv[0] == "demo":
        from .demo import main as run
    else:
        from .bench.__main__ import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
