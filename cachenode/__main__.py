from cachenode.cli import main

raise SystemExit(main())
