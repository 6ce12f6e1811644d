"""The load-test library: the photos mix, the answer checks, Locust's users and runner, and
the fault, overload, scaling and worst-case runs that ``loadtest/*.py`` start."""
