"""What every training stage shares: the Lightning Trainer and its callbacks (`trainer`), loggers and the
DataModule from the config (`runtime`), resume, fault tolerance, DDP helpers, multi-rank generation
(`ranks`) and the speed/memory options of the 3D networks (`speed`)."""
