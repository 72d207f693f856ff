-- The example's table: each user reads their own todos and the shared ones, and writes only their own. fluxrt
-- delivers a change to a user only when this policy lets them see the row, and serve.py loads the rows under the
-- same policy, so the list on the page never holds another user's private todo.
CREATE TABLE IF NOT EXISTS public.todos (
    id bigserial PRIMARY KEY,
    owner text NOT NULL DEFAULT (auth.jwt() ->> 'sub'),
    title text NOT NULL,
    done boolean NOT NULL DEFAULT false,
    shared boolean NOT NULL DEFAULT false
);
ALTER TABLE public.todos ENABLE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS todos_read ON public.todos;
DROP POLICY IF EXISTS todos_add ON public.todos;
DROP POLICY IF EXISTS todos_change ON public.todos;
CREATE POLICY todos_read ON public.todos FOR SELECT USING (owner = auth.jwt() ->> 'sub' OR shared);
CREATE POLICY todos_add ON public.todos FOR INSERT WITH CHECK (owner = auth.jwt() ->> 'sub');
CREATE POLICY todos_change ON public.todos FOR UPDATE USING (owner = auth.jwt() ->> 'sub');
GRANT SELECT, INSERT, UPDATE ON public.todos TO authenticated;
GRANT USAGE ON SEQUENCE public.todos_id_seq TO authenticated;
SELECT enable_realtime('public.todos');
