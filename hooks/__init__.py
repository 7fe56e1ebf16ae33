"""Hook specifications of gem and the markers plugins use.

A plugin module writes::

    from gem import hookimpl

    @hookimpl
    def gem_register_oracles(register):
        register("my_oracle", MyOracle, options=MyOracleOptions)

and declares itself under the ``gem`` entry-point group of its package.
"""

import pluggy

PROJECT = "gem"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["PROJECT", "hookspec", "hookimpl"]
