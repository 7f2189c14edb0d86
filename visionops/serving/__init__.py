"""The online service of `visionops serve-model`: the champion over HTTP, following the
alias (a promotion or rollback is loaded in the background and swapped in atomically)."""
