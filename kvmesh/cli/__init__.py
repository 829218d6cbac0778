"""The `kvmesh` command (`kvmesh.cli.main:main`): flags and variables read once into the roles' configs
(`settings`), `serve` and `up` (`launcher`), `demo` and the client commands."""
