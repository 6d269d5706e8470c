"""Getting from a bare machine to a project that trains: `download` (the recipe's files from the hub),
`scaffold` (`wanpair init`: dataset.toml and wanpair.toml), `doctor` (will a training start here)."""
