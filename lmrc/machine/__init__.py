"""What lmrc learns about the machine it runs on and how it survives it: CPU kinds, the kernel probe and its verdict, the crash watcher, precision and threads, the heap."""
