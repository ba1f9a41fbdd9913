"""Command-line pieces shared by the scripts of the three tasks and ``tools/``."""
import argparse
import ast

__all__ = ['ParseKwargs']


class ParseKwargs(argparse.Action):
    """``--model-kwargs depths=2,2,2,2 mlp_head=False`` -> dict; values are Python literals, else strings."""

    def __call__(self, parser, namespace, values, option_string=None):
        kwargs = dict(getattr(namespace, self.dest) or {})
        for item in values:
            if '=' not in item:
                parser.error(f'{option_string} expects key=value, got {item!r}')
            key, value = item.split('=', 1)
            try:
                kwargs[key] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                kwargs[key] = value
        setattr(namespace, self.dest, kwargs)
