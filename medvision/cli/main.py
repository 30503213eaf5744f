"""Entry point of the ``medvision`` command."""
def main(argv=None):
    return 0
