"""Boot a Rustux kernel image under Unicorn with a given ELF as bin/init, and say what happened."""
